"""The input pipeline: image sources, seeded transforms and samples, step samplers, loaders, tar shards, the pixel
cache and segmentation data."""
