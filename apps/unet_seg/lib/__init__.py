"""Shared library of the unet_seg MONAI Label app: configs, trainers, inferers and engines."""
