"""Models: recurrent cores, losses, sampling, the LightningModule."""
