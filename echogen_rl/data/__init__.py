"""Data sources: procedural shapes (offline default), COCO, LayoutSAM, random layouts."""
