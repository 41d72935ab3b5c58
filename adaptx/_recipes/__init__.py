"""Recipes: complete optimizers assembled from adaptx transforms."""
