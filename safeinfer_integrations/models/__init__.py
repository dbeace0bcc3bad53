"""Working with transformers models, whatever the architecture: where layers and projections are
(`architecture`), loading the default model and others (`loading`), the transformers version differences
(`compat`), padding and answer log-likelihoods (`batching`), and the local embedding model's files
(`embeddings`)."""
