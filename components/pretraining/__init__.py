"""Self-supervised pretraining: encoders trained on unlabelled images, registered as backbones."""
