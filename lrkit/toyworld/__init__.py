"""The toy world: a procedural picture world with exact ground truth (DESIGN section 7).

Pictures are one or two flat-coloured objects on a scene background, drawn with numpy and PIL
from a seed (same seed, same bytes) at any resolution (64 px by default):

- Scenes (`SCENES`): beach (sky, sea, sand bands), snow (pale sky, white ground), grass (blue
  sky, green ground), night (dark blue with stars), desert (pale sky, orange dunes), brick (a red
  brick wall), studio (a plain teal backdrop; its captions name no place). Horizons, tint, stars,
  dunes and bricks vary with the seed.
- Objects (`CLASSES`): ball, cube, cone, star, vase, mug, teapot, mushroom, each with a few
  shape parameters; `COLORS`: red, orange, yellow, green, blue, purple, white, black;
  `PATTERNS`: plain, striped, dotted, checked (in a darker shade of the colour). A colour never
  appears on a scene whose background comes near it (`compatible_colors`). Objects sit anywhere
  in the frame, 30-70 % of its side, turned by up to 15 degrees.
- Captions: "a photo of a red striped vase on the beach", "a blue cube and a yellow ball in the
  snow"; every word is one CLIP token.
- Subjects (`SUBJECTS`, `Subject`): unique objects with features no generic class member has,
  photographed large and centred on the studio backdrop (`Subject.photos`) and placed into any
  scene (`Subject.render`).
- Scorers (`lrkit.toyworld.scorers`): scene, object mask, class, colour, pattern, subject
  identity, centre and scale, layout diversity sigma^2_avg - computed from the world's own
  models, no learned network.

This package imports neither lrkit.training nor lrkit.inference.
"""

from lrkit.toyworld.render import Sample, render, render_mask, sample
from lrkit.toyworld.scorers import (
    IDENTITY_THRESHOLD,
    center_and_scale,
    classify_object,
    classify_scene,
    identity_components,
    is_subject,
    layout_diversity,
    object_color,
    object_pattern,
    score_image,
    segment_object,
    subject_identity,
    subjects_found,
)
from lrkit.toyworld.subjects import SUBJECTS, Subject, get_subject, subject_pair
from lrkit.toyworld.world import (
    CLASSES,
    COLORS,
    PATTERNS,
    SCENE_NAMES,
    SCENES,
    ObjectSpec,
    SceneSpec,
    caption,
    caption_words,
    compatible_colors,
    scene_of,
)

__all__ = [
    "CLASSES",
    "COLORS",
    "IDENTITY_THRESHOLD",
    "ObjectSpec",
    "PATTERNS",
    "SCENES",
    "SCENE_NAMES",
    "SUBJECTS",
    "Sample",
    "SceneSpec",
    "Subject",
    "caption",
    "caption_words",
    "center_and_scale",
    "classify_object",
    "classify_scene",
    "compatible_colors",
    "get_subject",
    "subject_pair",
    "subjects_found",
    "identity_components",
    "is_subject",
    "layout_diversity",
    "object_color",
    "object_pattern",
    "render",
    "render_mask",
    "sample",
    "scene_of",
    "score_image",
    "segment_object",
    "subject_identity",
]
