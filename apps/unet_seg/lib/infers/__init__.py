"""Inferers: a shared BasicInferTask base plus one small file per model."""
