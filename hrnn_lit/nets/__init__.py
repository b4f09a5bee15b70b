"""Networks of the model API (``api``): the built-in recurrent core (session RNN, RNN
Concat, HRNN variants), hrnn_history and the attention example."""
