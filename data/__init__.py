"""`crossmodal.data`: files shipped inside the package (the default model, the sample captions)."""
