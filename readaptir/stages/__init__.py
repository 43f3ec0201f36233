"""Stage kinds, a module each (embed serves the embed and queries stages; score's metric names
serve recipes and the report too). ``readaptir.runner`` calls their entry points: train_adapter,
compute_delta, merge, embed_corpus, embed_queries, search, fetch, and score through
``readaptir.evaluation``. No CLI code here."""
