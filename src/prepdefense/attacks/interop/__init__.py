"""Interoperability with the peer libraries (issue 12, item 3): prepdefense defenses inside
IBM ART, foolbox 3 and torchattacks attacks, and ART / foolbox models under prepdefense's
attacks and verdict.

One direction: a defense as an ART ``PreprocessorPyTorch`` whose ``forward`` carries BPDA (and
EOT) (:func:`as_art_preprocessor`), or the defended model as an ART classifier
(:func:`as_art_classifier`), a foolbox ``PyTorchModel`` (:func:`as_foolbox_model`) or the
module torchattacks takes (:func:`as_torchattacks_model`). The other: an ART
``PyTorchClassifier`` (:func:`from_art_classifier`) or a foolbox model
(:func:`from_foolbox_model`) as a plain ``nn.Module`` of [0,1] NCHW -> logits.

The peer libraries are imported only inside the functions that need them, so importing this
package needs none of them; a missing one raises an ImportError naming its extra
(``pip install 'prepdefense[art]'``, ``'prepdefense[foolbox]'``; torchattacks with
``--no-deps``). The package lives in the attacks layer: it composes BPDA and EOT
(:mod:`prepdefense.attacks.bpda`, :mod:`prepdefense.attacks.eot`) around defenses.
"""

from __future__ import annotations

from .adapted import DrawSource, PeerModel
from .art import as_art_classifier, as_art_preprocessor, from_art_classifier
from .foolbox import as_foolbox_model, from_foolbox_model
from .torchattacks import as_torchattacks_model

__all__ = ["DrawSource", "PeerModel", "as_art_preprocessor", "as_art_classifier", "from_art_classifier",
           "as_foolbox_model", "from_foolbox_model", "as_torchattacks_model"]
