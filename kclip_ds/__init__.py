"""kclip_ds: DeepSpeed training of CLIP models with structured knowledge."""
