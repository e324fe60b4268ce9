"""The toy world: procedural 32x32 scenes with exact ground truth, standing in for real SD data.

- `vocab`:  colours, shapes, background styles, characters, caption words, tokenizer, `Concept`.
- `scenes`: renders scenes (image, per-object masks, caption); fast batches for training.
- `judge`:  reads an image back into objects + background style (the toy world's "NudeNet").

Nothing heavy is imported here; import the submodules you need.
"""
