"""The Mixtral decoder (and the dense Mistral shape through the same code)."""
