"""The real-digits world: scikit-learn's bundled 8x8 handwritten digits, a CNN concept detector and a teacher.

Unlike the tiny world, the images are real data and the detector is a trained classifier, as in the concept-erasure
papers' class-forgetting protocol (a pretrained classifier scoring real-image classes).
"""
