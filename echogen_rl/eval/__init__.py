"""Evaluation: metrics, inference (generate and ground), COCO AP, statistics, pictures, the reward check."""
