"""Short explanations for the choices that confuse beginners, shown collapsed next to them."""
import streamlit as st

TOPICS = {
    "doctor": ("How does the doctor find wrong labels?", """
Each image is turned into a list of numbers by the pretrained backbone (its **embedding**). A
simple classifier learns the classes from those numbers five times, each time without a fifth of
the images, so every image is judged by a classifier that never saw it. When that classifier is
sure an image belongs to another class than its folder says, the image is flagged (the
**cleanlab** library's *confident learning*). It is a hint, not a verdict: look at each image
before you fix it. **Near-duplicates** are images whose embeddings point the same way (cosine
0.97 or more); **outliers** are far from all their neighbours.
"""),
    "freezing": ("What does freezing do?", """
A pretrained network already knows how to see: its early blocks find edges and textures, its
later blocks find object parts. **Freezing** a block means its weights are not changed by training.

- **Head only**: only the new last layer (the *head*) learns; the backbone stays as it was. Because
  the backbone never changes, the app computes its features once and caches them, so every epoch
  trains a single small layer: seconds on a laptop. Works well when your photos look like ImageNet's.
- **Top-k blocks**: the last k blocks also adapt to your images. Slower, often better when your
  images differ from everyday photos (X-rays, cartoons, sketches).
- **Full fine-tune**: everything learns. Slowest; needs more data and a smaller learning rate.
- **From scratch**: random weights, nothing pretrained. The baseline that shows what pretraining buys.
"""),
    "augmentation": ("What is augmentation, and which ones should I pick?", """
**Augmentation** shows the network a slightly different version of each training image every epoch
(flipped, rotated, cropped, recoloured), so it learns what matters and not the exact pixels. It only
touches training images; validation and test images are never changed.

- **Photos** of objects, animals, flowers: horizontal flip, random resized crop, a little colour jitter.
- **Cartoons, icons, clothes on a plain background**: flips and small rotations; strong colour changes
  can destroy what defines the class.
- **Text, digits, arrows, anything with a left and right**: no flips (a flipped 2 is not a 2).
- Vertical flips only suit images without an up and down (microscopy, satellite).

With augmentation on, the feature cache is off (the images change each epoch), so training is slower.
"""),
    "learning_rate": ("What does the learning rate do?", """
The **learning rate** is the size of each step the optimiser takes downhill on the loss.

- Too **high**: the loss jumps around or becomes NaN (the app stops the run and says so).
- Too **low**: the loss falls very slowly; you run out of epochs before it is good.
- Starting points: 1e-3 for Adam/AdamW and for training a head; 1e-2 to 1e-3 for SGD with momentum;
  10× smaller when fine-tuning the whole network, so pretrained features are not wiped out.

A **schedule** (StepLR, cosine) lowers the rate during training: big steps first, fine steps at the end.
Try the Experiments page: sweep the learning rate and compare the curves.
"""),
    "validation": ("Why are validation and test accuracy different?", """
The images are split three ways. The network learns from **train**. After every epoch the app
measures **validation** accuracy and keeps the best epoch's checkpoint: so validation took part in a
choice, and is a little optimistic. **Test** images are used once, at the end, on that best
checkpoint: the honest estimate of how the model does on new images.

A big gap between train and validation accuracy means **overfitting** (the network memorised the
training images): use more data, augmentation, fewer trainable blocks, or fewer epochs. Small test
sets make test accuracy noisy: with 50 test images one mistake moves it by 2 points.
"""),
    "sparsity": ("What does sparsity mean?", """
After a ReLU, every negative value becomes exactly zero. **Sparsity** is the share of zeros in a
layer's output; the app shows its complement, the percentage of **non-zero** activations.

Early layers respond to edges and colours found almost everywhere, so many units are active. Deeper
layers respond to specific object parts, so for a given image most of them stay silent: the
percentage of non-zero activations usually falls with depth. Networks with smooth activations (GELU,
SiLU) have few exact zeros; the app then reports the share of positive values instead.
"""),
    "sanity": ("Can I trust a heat map?", """
A heat map is supposed to show what **the model** used. Some methods mostly redraw the picture's
edges, whatever the network learnt, and still look convincing. The sanity check (Adebayo et al.,
2018) tests this by breaking the model on purpose and drawing the map again:

- **Top block randomised**: the last block and the head get fresh random weights.
- **All weights randomised**: the whole network is random; it knows nothing any more.
- **Head fit to shuffled labels**: a new head learns from training images with their labels mixed
  up, so it knows nothing about the classes.

The number is how similar the new map is to the real one (1 = identical, 0 = unrelated). A map
that barely changes when the network is random can't be explaining the network: don't trust it.

**Average Grad-CAM per class**: averaged over many test images, the heat should sit where the
objects are. Heat on the edges or background of every image of a class means the model may
recognise that class by its background (a *shortcut*), e.g. "wolf" by the snow.
"""),
}


def explain(topic: str, inside_expander: bool = False) -> None:
    """Collapsed until clicked. Streamlit forbids an expander inside an expander, so within one
    the explanation opens as a popover."""
    title, text = TOPICS[topic]
    box = st.popover(title, icon=":material/school:") if inside_expander else st.expander(title, icon=":material/school:")
    with box:
        st.markdown(text)
