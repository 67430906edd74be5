"""What the emitted train.py runs on besides its model: data, checkpoints,
metrics, the loop's plumbing, plots. Nothing here imports the compiler."""
