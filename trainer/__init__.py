"""The application: CLI dispatch, data, backbones, the training job and the store."""
