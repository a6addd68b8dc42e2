"""Trainers: a shared BasicTrainTask base plus one small file per model."""
