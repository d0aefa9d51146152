"""The model and its inputs: architecture adapter (the only model access), activation hooks,
tokens and padded batches, requests and request files, model loading and fingerprints, LM
readouts (target scores, continuations), errors and paths. Imports nothing else of factedit."""
