"""The training job: ``launch/train.py`` runs :func:`pp_ext.training.entry.main` under the
``deepspeed`` launcher; checks before launch, the loss, the answer accuracy."""
