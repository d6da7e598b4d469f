"""The pipeline stages, in data-flow order: archive, saliency, refine, experts, train,
evaluate, predict."""
