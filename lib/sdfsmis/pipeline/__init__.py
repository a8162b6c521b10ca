"""From volumes to a segmentation: the predictor (the one inference entry point), the volume
segmenter (supports, slices and back), where the radiologist drew (grounding), another
patient's organ range (placement), and how the model runs fast on a device."""
