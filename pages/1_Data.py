"""Data: choose a data set, see what is in it, and decide how to split it."""
import streamlit as st

from pages import show_loading

loading = show_loading()      # the imports below take seconds on a server's first visit

import secrets
from pathlib import Path

import altair as alt
import pandas as pd

from core.data import DataError
from core.data.images import IMAGE_EXTENSIONS
from core.data import folders
from core.data import splits as splitting
from core.data import zips
from core.data import downloads
from core import paths
from core.serve import access
from pages import common

loading.empty()

settings = common.setup("Data")
st.title("Data")

SOURCES = {
    "demo": "Built-in demo (Fashion-MNIST, 10 classes)",
    "zip": "Upload a .zip of class folders",
    "folder": "Upload a folder of class folders",
    "images": "Upload images into a class",
    "camera": "Take photos with the camera",
    "path": "Folder on this server",
    "download": "Download a standard data set",
}


@st.cache_data(show_spinner="Scanning images…", max_entries=16)
def scan(root: str, stamp: float) -> folders.DataScan:   # stamp: part of the cache key
    return folders.scan_folder(root)


def folder_stamp(root: Path) -> float:
    """Changes when files are added to the folder tree (class folders' mtimes)."""
    try:
        return sum(p.stat().st_mtime for p in [root, *root.iterdir(), *root.glob("*/*")] if p.is_dir())
    except OSError:
        return 0.0


@st.cache_data(show_spinner="Looking for duplicate files…", max_entries=16)
def identical(root: str, stamp: float) -> list[list[str]]:
    found = scan(root, stamp)
    return splitting.identical_files(found.root, [it.path for it in found.items])


def upload_limit() -> None:
    """Streamlit refuses bigger files before the page sees them, so say the limit up front."""
    limit = st.get_option("server.maxUploadSize")
    st.caption(f"Upload limit: {limit} MB per file (server.maxUploadSize in .streamlit/config.toml).")


def save_files(target: Path, files) -> None:
    """Store uploaded files below `target`; names that would lead elsewhere are refused."""
    refused = [f.name for f in files if zips.save_upload_file(target, f.name, f.getvalue()) is None]
    if refused:
        st.warning(f"{len(refused)} file name(s) refused (they would lead outside the upload "
                   f"folder, or are too long for the disk): {', '.join(repr(n) for n in refused[:5])}")


def use_folder(root: Path, label: str) -> None:
    settings["data_root"], settings["data_label"] = str(root), label


def session_folder() -> Path:
    """Where this session's uploaded single images collect, one sub-folder per class."""
    name = common.lab().page.setdefault("upload_folder", f"images-{secrets.token_hex(4)}")
    return access.uploads_dir(common.user()) / name


def check_room(nbytes: int) -> None:
    """Refuse an upload bigger than what is left of this user's allowance."""
    allowed = access.upload_allowance(common.user(), common.policy())
    if nbytes > allowed:
        raise access.AccessError(f"These files take {nbytes / 2**20:,.0f} MB; you have "
                                 f"{allowed / 2**20:,.0f} MB left. Delete old uploads (My uploads below).")


def my_uploads() -> None:
    """This user's uploads with their sizes, each deletable; the quota they count against."""
    who, rules = common.user(), common.policy()
    rows = access.my_uploads(who)
    used = sum(size for _, size, _ in rows)
    with st.expander(f":material/folder: My uploads ({len(rows)}, {used / 2**20:,.1f} MB"
                     + ("" if who.admin else f" of {rules.user_mb:,} MB") + ")"):
        if not rows:
            st.caption("Nothing uploaded yet.")
        for name, size, _ in rows:
            left, right = st.columns([4, 1])
            left.caption(f"`{name}` · {size / 2**20:,.1f} MB")
            if right.button("Delete", key=f"del_upload_{name}"):
                access.delete_upload(who, name)
                st.rerun()


def class_folder_name(name: str) -> str:
    return "".join(c for c in name.strip() if c.isalnum() or c in " -_")[:60] or "class"


def camera_capture(folder: Path) -> None:
    """Teachable-Machine style: pick a class, take snapshots, each one lands in that class. Shares
    its folder with "Upload images into a class", so both can fill one data set."""
    st.caption("Hold up an object, take a snapshot, press *Add*; repeat for every class (at least "
               "two, ideally 20+ photos each, from different angles). The browser asks for camera "
               "permission first.")
    cls = st.text_input("Class for the next snapshots", placeholder="e.g. mug", key="cam_class")
    shot = st.camera_input("Snapshot", key="cam_shot", disabled=not cls.strip())
    if shot is not None and st.button("Add this snapshot to the class", type="primary", key="cam_add"):
        name = class_folder_name(cls)
        count = len(list((folder / name).glob("*.jpg"))) if (folder / name).exists() else 0
        zips.save_upload_file(folder / name, f"camera-{count + 1:04d}.jpg", shot.getvalue())
        st.success(f"Saved snapshot {count + 1} of '{name}'.")
    if folder.exists():
        counts = {p.name: len(list(p.glob("*.*"))) for p in sorted(folder.iterdir()) if p.is_dir()}
        st.caption("So far: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
        use_folder(folder, "Camera snapshots")


source = st.radio("Source", list(SOURCES), format_func=SOURCES.get, horizontal=True,
                  key="data_source",
                  index=list(SOURCES).index(common.lab().page.get("data_source_value", "demo")))
common.lab().page["data_source_value"] = source

if source == "demo":
    use_folder(paths.DEMO_DATA, "Built-in demo: Fashion-MNIST (10 classes × 100 photos)")
    st.caption("Zalando's Fashion-MNIST (MIT licence): 28×28 greyscale product photos, "
               "a class-balanced subset shipped with the app so it works offline.")
elif source == "zip":
    upload = st.file_uploader("Zip with one folder per class (or train/val/test folders)",
                              type=["zip"], key="zip_upload")
    upload_limit()
    if upload is not None:
        try:
            with st.spinner("Unpacking…"):
                use_folder(common.save_zip(upload.getvalue(), upload.name), f"Upload: {upload.name}")
        except (DataError, access.AccessError) as err:
            st.error(str(err))
            common.stop()
elif source == "folder":
    files = st.file_uploader("Choose a folder whose sub-folders are the classes", type=None,
                             accept_multiple_files="directory", key="dir_upload")
    upload_limit()
    if files:
        blob = b"".join(f.name.encode() + f.size.to_bytes(8, "little") for f in files)
        target = zips.upload_dir(blob, "folder", parent=access.uploads_dir(common.user()))
        if not target.exists():
            try:
                check_room(sum(f.size for f in files))
                with st.spinner(f"Saving {len(files)} files…"):
                    save_files(target, files)
            except (DataError, access.AccessError) as err:
                st.error(str(err))
                common.stop()
        use_folder(target, f"Uploaded folder ({len(files)} files)")
elif source == "images":
    folder = session_folder()
    cls = st.text_input("Class name for these images", placeholder="e.g. cats", key="img_class")
    files = st.file_uploader("Images", type=sorted(e[1:] for e in IMAGE_EXTENSIONS),
                             accept_multiple_files=True, key="img_upload")
    upload_limit()
    if st.button("Add to class", disabled=not (files and cls.strip())):
        safe = class_folder_name(cls)
        try:
            check_room(sum(f.size for f in files))
            save_files(folder / safe, files)
            st.success(f"Added {len(files)} image(s) to '{safe}'.")
        except (DataError, access.AccessError) as err:
            st.error(str(err))
    if folder.exists():
        use_folder(folder, "Uploaded images")
    else:
        st.info("Add images of at least two classes, one class at a time.")
elif source == "camera":
    camera_capture(session_folder())
elif source == "download":
    name = st.selectbox("Data set", list(downloads.STANDARD_SETS), key="std_set",
                        format_func=lambda n: downloads.STANDARD_SETS[n].title)
    cap = st.number_input("Keep at most this many images per class and split (0 = all)", 0,
                          100_000, 100, key="std_cap")
    if downloads.target_dir(name).joinpath(".complete").exists():
        use_folder(downloads.target_dir(name), downloads.STANDARD_SETS[name].title)
    elif not common.user().admin:
        st.info("Only the teacher can download data sets on this server (they take disk space "
                "for everyone); once downloaded, a set is here for every student.")
    elif st.button("Download", type="primary"):
        bar = st.progress(0.0, text="Checking the connection…")
        try:
            folder = downloads.download(name, cap or None, lambda text, f: bar.progress(min(f, 1.0), text=text))
            use_folder(folder, downloads.STANDARD_SETS[name].title)
            bar.empty()
        except Exception as err:  # noqa: BLE001 - network and archive errors all end here
            bar.empty()
            st.error(f"Download failed: {err}")
else:
    if "w_typed_path" not in st.session_state:      # widget state is dropped when the page is left
        st.session_state["w_typed_path"] = common.lab().page.get("typed_path", "")
    typed = st.text_input("Folder path on the server", key="w_typed_path", placeholder="/data/flowers")
    common.lab().page["typed_path"] = typed
    if not common.user().admin:
        allowed = access.roots(common.policy()) + [access.uploads_dir(common.user())]
        st.caption("Folders you may open (the teacher's shared sets, the demo, your own uploads): "
                   + ", ".join(f"`{r}`" for r in allowed))
    if typed:
        try:
            use_folder(common.server_folder(typed), f"Folder: {typed}")
        except access.AccessError as err:
            st.error(str(err))
            common.stop()

my_uploads()
root = Path(settings["data_root"])
if not root.is_absolute():
    root = paths.REPO_ROOT / root
if problem := access.run_data_problem(common.user(), str(root), common.policy()):
    st.error(f"{problem} Pick another data set.")      # e.g. a preset naming someone's folder
    common.stop()
if not root.is_dir():
    common.stop()
try:
    result = scan(str(root), folder_stamp(root))
except DataError as err:
    st.error(str(err))
    common.stop()

counts = result.counts()
c1, c2, c3, c4 = st.columns(4)
c1.metric("Classes", len(result.classes))
c2.metric("Images", len(result.items))
c3.metric("Skipped files", len(result.skipped))
c4.metric("Pre-split", "yes" if result.presplit else "no")
for problem in result.errors():
    st.error(problem)
for note in result.warnings():
    st.warning(note)

frame = pd.DataFrame({"class": list(counts), "images": list(counts.values())})
st.altair_chart(alt.Chart(frame, title="Images per class").mark_bar().encode(
    x=alt.X("images:Q"), y=alt.Y("class:N", sort="-x"), tooltip=["class", "images"]),
    width="stretch")

with st.expander("Sample images per class", expanded=True):
    per_class = st.slider("Images per class", 4, 16, 8, key="samples_per_class")
    for label, name in enumerate(result.classes):
        picks = [it for it in result.items if it.label == label][:per_class]
        st.markdown(f"**{name}**")
        common.image_grid([common.thumbnail(str(Path(result.root) / it.path)) for it in picks],
                          [Path(it.path).name for it in picks], per_row=per_class)

if result.skipped:
    with st.expander(f"Skipped files ({len(result.skipped)})"):
        shown = result.skipped if common.user().admin else access.image_files_only(result.skipped)
        if len(shown) < len(result.skipped):
            st.caption(f"{len(result.skipped) - len(shown)} files that are not images are not listed.")
        st.dataframe(pd.DataFrame(shown, columns=["file", "reason"]), hide_index=True, width="stretch")

st.subheader("Split")
if result.presplit:
    st.caption("This folder comes with its own train/val/test folders; they are kept. "
               "A missing val or test split is carved out of train with the ratios below.")
cols = st.columns(4)
train_pct = cols[0].number_input("Train %", 1, 98, int(round(settings["split"][0] * 100)), key="train_pct")
val_pct = cols[1].number_input("Validation %", 0, 98, int(round(settings["split"][1] * 100)), key="val_pct")
test_pct = 100 - train_pct - val_pct
cols[2].metric("Test %", test_pct)
settings["split_seed"] = cols[3].number_input("Split seed", value=settings["split_seed"], key="split_seed",
                                              **common.limits("split_seed"))
if test_pct < 0:
    st.error("Train and validation add up to more than 100%.")
    common.stop()
settings["split"] = (train_pct / 100, val_pct / 100, test_pct / 100)
few = st.checkbox("Few-shot: cap training images per class", value=settings["max_per_class"] is not None,
                  key="few_shot")
settings["max_per_class"] = int(st.number_input("Images per class (train)", value=settings["max_per_class"] or 10,
                                                key="cap", **common.limits("max_per_class"))) if few else None

splits = splitting.split_items(result, settings["split"], settings["split_seed"], settings["max_per_class"])
table = pd.DataFrame({s: pd.Series([result.classes[it.label] for it in items]).value_counts()
                      for s, items in splits.items()}).reindex(result.classes).fillna(0).astype(int)
st.dataframe(table, width="stretch")
groups = splitting.across_splits(identical(str(root), folder_stamp(root)), splits)
for split, n in splitting.leaked_counts(groups).items():
    if n:
        st.warning(f"{n} images appear in both train and {split} (identical files): {split} accuracy "
                   "will be optimistic (leakage). Remove the copies, or keep them in one split.")
common.link("model", "Next: choose a model", ":material/arrow_forward:")

common.finish()
