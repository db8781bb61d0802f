"""Ray Tune search over any recipe's config: search spaces, the search driver, its results."""
