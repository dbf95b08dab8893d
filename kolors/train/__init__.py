"""Training LoRAs for Kolors: `train_lora(TrainConfig(...))`, the engine of `kolors train-lora`."""

from kolors.train.loop import LOG_COLUMNS, LORA_FILE, TrainConfig, diffusion_loss, train_lora

__all__ = ["LOG_COLUMNS", "LORA_FILE", "TrainConfig", "diffusion_loss", "train_lora"]
