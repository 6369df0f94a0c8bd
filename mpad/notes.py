"""What every output made with random weights says (a light module: stages without a model import it)."""

RANDOM_WEIGHTS_NOTE = (
    "RANDOM WEIGHTS (model.pretrained = none): these numbers exercise the pipeline and say nothing "
    "about the method's real quality"
)
