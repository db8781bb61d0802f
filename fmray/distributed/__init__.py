"""DeepSpeed config building, engine setup and the Ray runtime around them."""
