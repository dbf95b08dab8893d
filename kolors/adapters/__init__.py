"""Adapters: each changes a loaded model through one visible seam, never by forking a model file (LoRA changes
weights and can be taken back exactly; an image prompt adds keys and values beside the text ones; a ControlNet
returns residuals the UNet adds). lora: LoRA files through the `lora` term of kolors.models.layers."""
