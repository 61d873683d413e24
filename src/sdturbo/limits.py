"""The pipeline's input limits, in a module without torch, so the command line checks them before a model loads."""

MAX_STEPS = 50  # sampling steps a call may run
MAX_SIDE_PX = 2048  # image width and height
MAX_IMAGES_PER_PROMPT = 64
VAE_FACTOR = 8  # pixels per latent, in every model sdturbo loads (SDXL's VAE); the pipeline reads its spec's
