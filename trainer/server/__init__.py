"""`python -m trainer serve`: AutoML's v1 REST API (and v1beta1's, for video) over the same store
and the same functions as the CLI verbs."""
