"""Training data: records read from files or the hub (:mod:`.records`), made into
fixed-shape micro-batches of token ids and labels (:mod:`.batches`)."""

IGNORE_INDEX = (
    -100
)  # a label the loss skips: torch.nn.functional.cross_entropy's default ignore_index
