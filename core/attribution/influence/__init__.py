"""Prototype-block influence: influence functions restricted to the prototype parameters.

Notation (see core/model/head.py). Prototype j owns theta_j = (K_j, W_j), 2d numbers. A position
with final hidden state h has scores s_j = h . K_j, active set S = top k of s, weights
a_j = g_j softplus(s_j)^q (g: controller gains; q the head's weight power, 1 unless trained with
another), z = sum_{j in S} a_j W_j, logits = E z and p = softmax(logits). Its loss L = -log p_y
has, for j in S,

    dL/dW_j = a_j r,    dL/dK_j = c_j h,    c_j = g_j q softplus(s_j)^(q-1) sigmoid(s_j) (W_j . r),
    r = E^T (p - e_y)   (d,)

and zero for every other prototype (the top-k choice is piecewise constant). A token's
gradient therefore touches only its k active blocks, and all k are built from the same two
d-vectors h and r and the 2k numbers c_j, a_j: one forward pass gives them, no backward.

Curvature. The Gauss-Newton matrix of the training loss, G = sum_t J_t^T H_t J_t with
H_t = diag(p_t) - p_t p_t^T, only has entries in blocks (i, j) with i, j both active at t. We
keep its diagonal blocks G_j (2d x 2d): EK-FAC restricts the curvature to layers, we restrict
it to prototypes. Each block is estimated as the Fisher, which equals the Gauss-Newton matrix
in expectation: with a label y' drawn from p_t, E[g' g'^T] = J_t^T H_t J_t, so
G_j ~ (N / n) sum over n sampled positions t with j in S_t of g'_tj g'_tj^T (N: positions in
the training split). Labels come from a generator seeded by (seed, sequence), so the factors
do not depend on the batch size.

Inverse, once at index time: the complement-preserving inverse. With damping
lambda_j = damping * mean eigenvalue of G_j (the mean over all blocks for an unused prototype),
the top r eigenpairs (U_j (2d x r), sigma_j) of G_j (subspace iteration; eigh at r = 2d) and
rho_j = (tr G_j - sum sigma_j) / (2d - r), the mean of the eigenvalues left out,

    A_j = U_j diag(w_j) U_j^T + kappa_j I,    kappa_j = 1/(rho_j + lambda_j),
    w_j = 1/(sigma_j + lambda_j) - kappa_j,

applied as A_j g = U_j (w_j * (U_j^T g)) + kappa_j g. It is (G_j + lambda_j I)^-1 on the kept
eigenvectors and, on every other direction, the damped inverse of their mean eigenvalue (a
truncated U (Sigma + lambda)^-1 U^T would give those directions weight 0, the largest weight
1/lambda_j of format 5 overweighted them); at r = 2d it is the exact inverse. So r trades build
time and factor memory (2d x r per prototype) against agreement with the exact inverse, and the
query's scan of the store does not depend on it (docs/benchmarks.md measures LDS per rank).

Store. Every attributable training position t (a document's token whose target is inside its
packed sequence) is stored, in stream order so that a document's positions are one contiguous
range (``document_offsets``): h_t, r_t (d each), its k active ids, c_tj and a_tj (k each) and
its token's character span, the float rows in int8 or float16 with one scale per row
(:mod:`.store`; 792 bytes per position at d = 256, k = 64 in int8). From them any block
gradient g_tj = [c_tj h_t ; a_tj r_t] is exact (up to the storage precision).

Scores. The influence of training document D on a query (the summed loss of the attributed
tokens), + = helpful (upweighting D lowers the query loss), is

    I(q, D) = g_q^T (G_blockdiag + Lambda)^-1 g_D = sum_j g_qj^T A_j g_jD
            = sum_{t in D} sum_{j in S_t and Q} c_tj <psi_j^K, h_t> + a_tj <psi_j^W, r_t>,

with psi_j = A_j g_qj = [psi_j^K ; psi_j^W] for the query's active prototypes Q. A query costs
one forward pass, |Q| inverse products and a bulk scan of the store: per chunk of positions,
(chunk x d) x (d x pairs) products for the K and W halves, gathered at each position's active
ids (every document scored exactly; memory bounded by the chunk). The example's marked token
is the position of D whose terms carry most of the query's score. Per document the build also
stores the self-influence sum_j g_jD^T A_j g_jD / positions (:func:`self_influence`).

File: ``BUNDLE/index/influence.safetensors`` (safetensors only), its build arguments and the
model and corpus fingerprints in the header; a mismatch or an older format is refused with the
command to rebuild. Beside it, ``self_influence.safetensors``: the documents' self-influence
alone (:mod:`.loading`), all that outliers need.

Modules: :mod:`.math` (the formulas above, on tensors), :mod:`.arguments` (the build's
options), :mod:`.store` (the position store and its bulk scan), :mod:`.fit` (the build),
:mod:`.query` (loading the factors and answering queries; :mod:`.credit` holds the values they
pass around) and :mod:`.method` (influence as an attribution method of the engine).
"""

from core.attribution.influence.arguments import InfluenceArguments
from core.attribution.influence.fit import build_influence
from core.attribution.influence.loading import (
    SELF_INFLUENCE_FILE,
    DocumentSelfInfluence,
    load_influence,
    outliers,
    save_self_influence,
    self_influence,
)
from core.attribution.influence.math import (
    active_set,
    apply_inverse_and_root,
    complement_weights,
    eigen_blocks,
    gradient_parts,
    head_probabilities,
    inverse_weights,
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
)
from core.errors import InfluenceError

__all__ = [
    "FORMAT_VERSION",
    "INFLUENCE_FILE",
    "SELF_INFLUENCE_FILE",
    "DocumentSelfInfluence",
    "InfluenceArguments",
    "InfluenceCredit",
    "InfluenceError",
    "InfluenceFactors",
    "RankedDocument",
    "active_set",
    "apply_inverse_and_root",
    "build_influence",
    "complement_weights",
    "eigen_blocks",
    "gradient_parts",
    "head_probabilities",
    "influence_exists",
    "inverse_weights",
    "load_influence",
    "outliers",
    "prototype_gradients",
    "sampled_targets",
    "save_self_influence",
    "self_influence",
]
