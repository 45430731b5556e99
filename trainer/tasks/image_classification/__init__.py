"""Image classification: a folder per label or AutoML's CSV; torchvision's classifiers."""
