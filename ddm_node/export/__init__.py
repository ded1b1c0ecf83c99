"""Exporting a bundle into other ecosystems: a diffusers pipeline directory, and pushing it to the Hugging Face hub."""
