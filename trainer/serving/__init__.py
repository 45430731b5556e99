"""Online prediction of deployed models (LitServe); see README.md."""
