"""Jobs: each module turns a config into a model, pure loss/step functions and figures."""
