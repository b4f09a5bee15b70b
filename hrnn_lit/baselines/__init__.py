"""Non-neural baselines as networks of the model API without trainable parameters
(``popularity``: POP, user popularity; ``knn``: Item-KNN, V-SkNN), fitted from the training
steps and evaluated by the one evaluation loop (``module``: their LightningModules)."""
