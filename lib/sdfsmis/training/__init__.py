"""Episodic fine-tuning on a site's own volumes: supervoxel pseudo-labels, episodes cropped as
inference crops, augmentation, the trainer and its checkpoints."""
