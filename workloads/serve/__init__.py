"""Serving (`llmc serve`, `llmc generate`, `llmc chat`, kind serve): the recipe, deployment on Ray Serve (`deploy`),
offline generation, the terminal chat, the local object store for adapters and the resource plan."""
