"""Batched KV-cache decoding and sampling, shared by serving (a threaded continuous-batching
engine), RL rollouts (the same engine driven in the caller's thread) and evaluation."""
