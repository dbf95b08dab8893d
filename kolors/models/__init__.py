"""The networks, each configured by a frozen dataclass read from its config.json: the ChatGLM3 tokenizer and text
encoder, the SDXL-style UNet, the VAE, and `layers`, the fast CPU layers they share with the pass that packs
their weights. Models know nothing of files, pipelines or faces: kolors.weights loads them."""
