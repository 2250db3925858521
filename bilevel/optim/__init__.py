"""Training: the bilevel problem, hypergradients, optimiser steps, the training loop and the baseline solvers."""
