"""Mixture-of-experts pieces the pipeline needs beyond transformers' own MoE layers: the
router's load-balancing loss pooled over stages (:mod:`pp_ext.moe.router_loss`) and the
experts' weight gradients deferred to the zero-bubble W pass (:mod:`pp_ext.moe.experts`)."""
