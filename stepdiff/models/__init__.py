"""Small networks for the book: an MLP for 2-D toys and attention layers for images."""
