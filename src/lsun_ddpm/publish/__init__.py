"""Publishing: the model card, the Hub upload, the Space and its app."""
