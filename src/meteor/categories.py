"""The four Stack Overflow categories of METEOR's corpus (machine learning, deep learning, NLP,
computer vision): the keys of ``scrape.categories`` and the rows of every per-category table."""

CATEGORIES = ("ML", "DL", "NLP", "CV")
