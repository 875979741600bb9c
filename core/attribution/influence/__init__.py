"""Prototype-block influence: influence functions restricted to the prototype parameters.

Notation (see core/model/head.py). Prototype j owns theta_j = (K_j, W_j), 2d numbers. A position
with final hidden state h has scores s_j = h . K_j, active set S = top k of s, weights
a_j = g_j softplus(s_j) (g: controller gains), z = sum_{j in S} a_j W_j, logits = E z and
p = softmax(logits). Its loss L = -log p_y has, for j in S,

    dL/dW_j = a_j r,    dL/dK_j = g_j sigmoid(s_j) (W_j . r) h,    r = E^T (p - e_y)   (d,)

and zero for every other prototype (the top-k choice is piecewise constant). A token's
gradient therefore touches only its k active blocks, and all k are built from the same two
d-vectors h and r.

Curvature. The Gauss-Newton matrix of the training loss, G = sum_t J_t^T H_t J_t with
H_t = diag(p_t) - p_t p_t^T, only has entries in blocks (i, j) with i, j both active at t. We
keep its diagonal blocks G_j (2d x 2d): EK-FAC restricts the curvature to layers, we restrict
it to prototypes. Each block is estimated as the Fisher, which equals the Gauss-Newton matrix
in expectation: with a label y' drawn from p_t, E[g' g'^T] = J_t^T H_t J_t, so
G_j ~ (N / n) sum over n sampled positions t with j in S_t of g'_tj g'_tj^T (N: positions in
the training split). Labels come from a generator seeded by (seed, sequence), so the factors
do not depend on the batch size.

Inversion, once at index time: a whitening factor V_j (2d x r) per block with
V_j V_j^T ~ (G_j + lambda_j I)^-1, damping lambda_j = damping * mean eigenvalue of G_j (the
mean over all blocks for an unused prototype). At full rank (r = 2d) V_j = L_j^-T from the
Cholesky factor of G_j + lambda_j I, and the inverse is exact. With r < 2d (the memory bound:
2d x r numbers per prototype) V_j = U_j (Sigma_j + lambda_j)^-1/2 from the top r eigenpairs
(found by subspace iteration), the projection onto the dominant curvature directions (the
idea of Arnoldi influence, Schioppa et al. 2022).

Scores. The influence of training document D on a query (the summed loss of the attributed
tokens), + = helpful (upweighting D lowers the query loss), is

    I(q, D) = g_q^T (G_blockdiag + Lambda)^-1 g_D = sum_j (V_j^T g_qj) . c_jD,
    c_jD = V_j^T sum_{t in D, j in S_t} g_tj,

so only blocks active in both the query and D contribute, and a query meets only documents
with a token that shares one of its active prototypes. The index stores, per prototype, the
r-vectors c_jD of its M documents with the largest self-influence |c_jD|^2 (the second memory
bound; M = None keeps all), as one list of entries sorted by prototype (``offsets[j]`` to
``offsets[j + 1]`` are prototype j's), so a prototype used by few documents costs only those.
A query costs one forward pass, k (2d x r) products per token and one (entries x r) product
per active prototype, read in the stored precision.

File: ``BUNDLE/index/influence.safetensors`` (safetensors only), its build arguments and the
model and corpus fingerprints in the header; a mismatch is refused with the command to rebuild.

Modules: :mod:`.math` (the formulas above, on tensors), :mod:`.arguments` (the build's
options), :mod:`.fit` (the build) and :mod:`.query` (loading the factors and answering queries).
"""

from core.attribution.influence.arguments import InfluenceArguments
from core.attribution.influence.fit import build_influence, save_influence
from core.attribution.influence.math import (
    active_set,
    head_probabilities,
    project,
    prototype_gradients,
    sampled_targets,
)
from core.attribution.influence.query import (
    FORMAT_VERSION,
    INFLUENCE_FILE,
    InfluenceCredit,
    InfluenceFactors,
    RankedDocument,
    influence_exists,
    load_influence,
)
from core.errors import InfluenceError

__all__ = [
    "FORMAT_VERSION",
    "INFLUENCE_FILE",
    "InfluenceArguments",
    "InfluenceCredit",
    "InfluenceError",
    "InfluenceFactors",
    "RankedDocument",
    "active_set",
    "build_influence",
    "head_probabilities",
    "influence_exists",
    "load_influence",
    "project",
    "prototype_gradients",
    "sampled_targets",
    "save_influence",
]
