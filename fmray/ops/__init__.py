"""Cluster operations: submitting fmray commands to a Ray cluster's job server and following
them (`fmray submit`, `fmray jobs`), through Ray's JobSubmissionClient."""
