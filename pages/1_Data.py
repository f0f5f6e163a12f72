"""Data: choose a data set, see what is in it, and decide how to split it. A stored data set
(core.data.versions) lists its versions, and any of them can become the data set of the next run."""
import streamlit as st

from pages import show_loading

LOADING = show_loading()      # the imports below take seconds on a server's first visit

import secrets
from pathlib import Path

import altair as alt
import pandas as pd

from core import config, paths
from core.data import DataError, downloads, feedback, folders, versions, zips
from core.data import splits as splitting
from core.data.images import IMAGE_EXTENSIONS
from core.serve import access
from pages import common
from pages.common.progress import progress_bar

SOURCES = {
    "demo": "Built-in demo (Fashion-MNIST, 10 classes)",
    "zip": "Upload a .zip of class folders",
    "folder": "Upload a folder of class folders",
    "images": "Upload images into a class",
    "camera": "Take photos with the camera",
    "path": "Folder on this server",
    "download": "Download a standard data set",
    "version": "A stored data set version",
}
DEMO_LABEL = "Built-in demo: Fashion-MNIST (10 classes × 100 photos)"


def main() -> None:
    LOADING.empty()
    settings = common.setup("Data")
    st.title("Data")
    source = choose_source()
    {"demo": demo_source, "zip": zip_source, "folder": folder_source, "images": images_source,
     "camera": camera_source, "path": path_source, "download": download_source,
     "version": version_source}[source](settings)
    my_uploads()
    root = data_folder(settings)
    versions_panel(settings, root)
    result = read_data_set(root)
    overview(result)
    samples(result)
    skipped_files(result)
    split_section(settings, result, root)
    common.link("model", "Next: choose a model", ":material/arrow_forward:")
    common.finish()


@st.cache_data(show_spinner="Scanning images…", max_entries=16)
def scan(root: str, stamp: float) -> folders.DataScan:   # stamp: part of the cache key
    return folders.scan_folder(root)


@st.cache_data(show_spinner="Looking for duplicate files…", max_entries=16)
def identical(root: str, stamp: float) -> list[list[str]]:
    found = scan(root, stamp)
    return splitting.identical_files(found.root, [it.path for it in found.items])


# ---------------------------------------------------------------- where the images come from

def choose_source() -> str:
    """The source radio, remembered across page switches (widget state is not)."""
    page = common.lab().page
    source = st.radio("Source", list(SOURCES), format_func=SOURCES.get, horizontal=True, key="data_source",
                      index=list(SOURCES).index(page.get("data_source_value", "demo")))
    page["data_source_value"] = source
    return source


def use_folder(settings: dict, root: Path, label: str) -> None:
    settings["data_root"], settings["data_label"] = str(root), label


def upload_limit() -> None:
    """Streamlit refuses bigger files before the page sees them, so say the limit up front."""
    limit = st.get_option("server.maxUploadSize")
    st.caption(f"Upload limit: {limit} MB per file (server.maxUploadSize in .streamlit/config.toml).")


def save_files(target: Path, files) -> None:
    """Store uploaded files below `target` within this user's allowance; names that would lead
    elsewhere are refused and listed."""
    refused = access.save_files(common.user(), common.policy(), target, [(f.name, f.getvalue()) for f in files])
    if refused:
        st.warning(f"{len(refused)} file name(s) refused (they would lead outside the upload "
                   f"folder, or are too long for the disk): {', '.join(repr(n) for n in refused[:5])}")


def session_folder() -> Path:
    """Where this session's uploaded single images collect, one sub-folder per class."""
    name = common.lab().page.setdefault("upload_folder", f"images-{secrets.token_hex(4)}")
    return access.uploads_dir(common.user()) / name


def demo_source(settings: dict) -> None:
    use_folder(settings, paths.DEMO_DATA, DEMO_LABEL)
    st.caption("Zalando's Fashion-MNIST (MIT licence): 28×28 greyscale product photos, "
               "a class-balanced subset shipped with the app so it works offline.")


def zip_source(settings: dict) -> None:
    upload = st.file_uploader("Zip with one folder per class (or train/val/test folders)",
                              type=["zip"], key="zip_upload")
    upload_limit()
    if upload is None:
        return
    try:
        with st.spinner("Unpacking…"):
            use_folder(settings, common.save_zip(upload.getvalue(), upload.name), f"Upload: {upload.name}")
    except (DataError, access.AccessError) as err:
        st.error(str(err))
        common.stop()


def folder_source(settings: dict) -> None:
    files = st.file_uploader("Choose a folder whose sub-folders are the classes", type=None,
                             accept_multiple_files="directory", key="dir_upload")
    upload_limit()
    if not files:
        return
    target = zips.folder_upload_dir([(f.name, f.size) for f in files], access.uploads_dir(common.user()))
    if not target.exists():        # the page reruns while the uploader holds the files: saved once
        try:
            with st.spinner(f"Saving {len(files)} files…"):
                save_files(target, files)
        except (DataError, access.AccessError) as err:
            st.error(str(err))
            common.stop()
    use_folder(settings, target, f"Uploaded folder ({len(files)} files)")


def images_source(settings: dict) -> None:
    folder = session_folder()
    cls = st.text_input("Class name for these images", placeholder="e.g. cats", key="img_class")
    files = st.file_uploader("Images", type=sorted(e[1:] for e in IMAGE_EXTENSIONS),
                             accept_multiple_files=True, key="img_upload")
    upload_limit()
    if st.button("Add to class", disabled=not (files and cls.strip())):
        safe = folders.class_folder_name(cls)
        try:
            save_files(folder / safe, files)
            st.success(f"Added {len(files)} image(s) to '{safe}'.")
        except (DataError, access.AccessError) as err:
            st.error(str(err))
    if folder.exists():
        use_folder(settings, folder, "Uploaded images")
    else:
        st.info("Add images of at least two classes, one class at a time.")


def camera_source(settings: dict) -> None:
    """Teachable-Machine style: pick a class, take snapshots, each one lands in that class. Shares
    its folder with "Upload images into a class", so both can fill one data set."""
    folder = session_folder()
    st.caption("Hold up an object, take a snapshot, press *Add*; repeat for every class (at least "
               "two, ideally 20+ photos each, from different angles). The browser asks for camera "
               "permission first.")
    cls = st.text_input("Class for the next snapshots", placeholder="e.g. mug", key="cam_class")
    shot = st.camera_input("Snapshot", key="cam_shot", disabled=not cls.strip())
    if shot is not None and st.button("Add this snapshot to the class", type="primary", key="cam_add"):
        name, number = zips.save_snapshot(folder, cls, shot.getvalue())
        st.success(f"Saved snapshot {number} of '{name}'.")
    if folder.exists():
        st.caption("So far: " + ", ".join(f"{k}: {v}" for k, v in folders.class_counts(folder).items()))
        use_folder(settings, folder, "Camera snapshots")


def download_source(settings: dict) -> None:
    name = st.selectbox("Data set", list(downloads.STANDARD_SETS), key="std_set",
                        format_func=lambda n: downloads.STANDARD_SETS[n].title)
    cap = st.number_input("Keep at most this many images per class and split (0 = all)", 0,
                          100_000, 100, key="std_cap")
    if downloads.target_dir(name).joinpath(".complete").exists():
        use_folder(settings, downloads.target_dir(name), downloads.STANDARD_SETS[name].title)
    elif not common.user().admin:
        st.info("Only the teacher can download data sets on this server (they take disk space "
                "for everyone); once downloaded, a set is here for every student.")
    elif st.button("Download", type="primary"):
        try:
            with progress_bar("Checking the connection…") as progress:
                folder = downloads.download(name, cap or None, progress)
            use_folder(settings, folder, downloads.STANDARD_SETS[name].title)
        except Exception as err:  # noqa: BLE001 - network and archive errors all end here
            st.error(f"Download failed: {err}")


def path_source(settings: dict) -> None:
    common.init_widget("w_typed_path", common.lab().page.get("typed_path", ""))   # widget state is dropped with the page
    typed = st.text_input("Folder path on the server", key="w_typed_path", placeholder="/data/flowers")
    common.lab().page["typed_path"] = typed
    if not common.user().admin:
        allowed = access.roots(common.policy()) + [access.uploads_dir(common.user())]
        st.caption("Folders you may open (the teacher's shared sets, the demo, your own uploads): "
                   + ", ".join(f"`{r}`" for r in allowed))
    if typed:
        try:
            use_folder(settings, common.server_folder(typed), f"Folder: {typed}")
        except access.AccessError as err:
            st.error(str(err))
            common.stop()


def version_source(settings: dict) -> None:
    """A version of a data set this user may read (their own; every one for the teacher)."""
    who = common.user()
    names = feedback.readable_names(who)
    if not names:
        st.info("No stored data set versions yet. They are made on the Predict page (predictions you "
                "mark right or wrong go back into the run's data set) and on the Evaluate page "
                "(a mislabelled image), or with `python -m core data snapshot FOLDER NAME`.")
        return
    if common.widget_value("ver_name") not in names:
        common.set_widget("ver_name", names[0])
    name = st.selectbox("Data set", names, key="ver_name")
    chain = {v.id: v for v in reversed(versions.versions(name)) if feedback.may_read(who, v)}   # newest first
    if common.widget_value("ver_id") not in chain:
        common.set_widget("ver_id", next(iter(chain)))
    vid = st.selectbox("Version", list(chain), key="ver_id", format_func=lambda i: f"{i} · {chain[i].note}")
    use_folder(settings, chain[vid].folder, f"Data set {chain[vid].ref}")


def versions_panel(settings: dict, root: Path) -> None:
    """The versions of the current data set when it is a stored one (its version's folder, or a
    folder stored under the name the Predict page gives it), and a switch to another version."""
    who = common.user()
    current = versions.version_of(root)
    name = current.name if current else feedback.data_set_name(root, who)
    chain = [v for v in versions.versions(name) if feedback.may_read(who, v)] if versions.NAME_RE.fullmatch(name) else []
    if not chain:
        return
    with st.expander(f":material/history: Versions of data set {name} ({len(chain)})", expanded=current is not None):
        if current is None:
            st.caption("This folder is stored as a data set; its versions are listed below. The folder "
                       "itself may have changed since.")
        table = pd.DataFrame([dict(id=v.id, parent=v.parent or "", note=v.note, author=v.author, files=len(v.files),
                                   created=v.created, current="←" if current and v.id == current.id else "")
                              for v in reversed(chain)])
        st.dataframe(table, hide_index=True, width="stretch")
        others = [v.id for v in reversed(chain) if not current or v.id != current.id]
        if others:
            left, right = st.columns([3, 1], vertical_alignment="bottom")
            pick = left.selectbox("Switch to version", others, key="ver_switch",
                                  format_func=lambda i: f"{i} · {versions.get(name, i).note}")
            right.button("Use this version", key="ver_use", on_click=switch_version, args=(settings, name, pick))
        delete_controls(chain, current, who)


def delete_controls(chain: list, current, who) -> None:
    """Delete a version of one's own that nothing derives from (the newest first): what it alone
    stored is freed, and no longer counts toward the quota. Refused while a run uses it."""
    if message := common.lab().take("ver_deleted"):
        st.success(message, icon=":material/delete:")
    if problem := common.lab().take("ver_delete_error"):
        st.error(problem)
    leaves = [v for v in reversed(chain) if (who.admin or v.author == who.id)
              and not any(c.parent == v.id for c in chain) and not (current and v.id == current.id)]
    if not leaves:
        return
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    pick = left.selectbox("Delete a version (only the newest of a line; runs trained on it must be deleted first)",
                          [v.id for v in leaves], key="ver_delete_pick")
    right.button("Delete", key="ver_delete", icon=":material/delete:", on_click=delete_version,
                 args=(chain[0].name, pick))


def delete_version(name: str, vid: str) -> None:
    try:
        freed = feedback.delete_version(common.user(), versions.get(name, vid))
    except (ValueError, OSError) as err:      # FeedbackError, VersionError
        common.lab().note("ver_delete_error", str(err))
        return
    common.lab().note("ver_deleted", f"Deleted {name}/{vid}; {freed / 2**20:,.1f} MB freed.")
    common.forget("ver_delete_pick")


def switch_version(settings: dict, name: str, vid: str) -> None:
    """Make a version the draft's data set, shown through the "stored version" source."""
    version = versions.get(name, vid)
    use_folder(settings, version.folder, f"Data set {version.ref}")
    common.lab().page["data_source_value"] = "version"
    common.forget("data_source", "ver_switch")
    common.set_widget("ver_name", name)
    common.set_widget("ver_id", vid)


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


# ---------------------------------------------------------------- what is in it

def data_folder(settings: dict) -> Path:
    """The chosen data set's folder; stops the page where this user may not read it or it is gone."""
    root = paths.data_root_path(settings["data_root"])
    if problem := access.run_data_problem(common.user(), str(root), common.policy()):
        st.error(f"{problem} Pick another data set.")      # e.g. a preset naming someone's folder
        common.stop()
    if not root.is_dir():
        common.stop()
    return root


def read_data_set(root: Path) -> folders.DataScan:
    try:
        return scan(str(root), folders.tree_stamp(root))
    except DataError as err:
        st.error(str(err))
        common.stop()


def overview(result: folders.DataScan) -> None:
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Classes", len(result.classes))
    c2.metric("Images", len(result.items))
    c3.metric("Skipped files", len(result.skipped))
    c4.metric("Pre-split", "yes" if result.presplit else "no")
    for problem in result.errors():
        st.error(problem)
    for note in result.warnings():
        st.warning(note)
    counts = result.counts()
    frame = pd.DataFrame({"class": list(counts), "images": list(counts.values())})
    st.altair_chart(alt.Chart(frame, title="Images per class").mark_bar().encode(
        x=alt.X("images:Q"), y=alt.Y("class:N", sort="-x"), tooltip=["class", "images"]),
        width="stretch")


def samples(result: folders.DataScan) -> None:
    with st.expander("Sample images per class", expanded=True):
        per_class = st.slider("Images per class", 4, 16, 8, key="samples_per_class")
        for label, name in enumerate(result.classes):
            picks = [it for it in result.items if it.label == label][:per_class]
            st.markdown(f"**{name}**")
            common.image_grid([common.thumbnail(str(Path(result.root) / it.path)) for it in picks],
                              [Path(it.path).name for it in picks], per_row=per_class)


def skipped_files(result: folders.DataScan) -> None:
    if not result.skipped:
        return
    with st.expander(f"Skipped files ({len(result.skipped)})"):
        shown = result.skipped if common.user().admin else access.image_files_only(result.skipped)
        if len(shown) < len(result.skipped):
            st.caption(f"{len(result.skipped) - len(shown)} files that are not images are not listed.")
        st.dataframe(pd.DataFrame(shown, columns=["file", "reason"]), hide_index=True, width="stretch")


# ---------------------------------------------------------------- the split

def split_section(settings: dict, result: folders.DataScan, root: Path) -> None:
    st.subheader("Split")
    if result.presplit:
        st.caption("This folder comes with its own train/val/test folders; they are kept. "
                   "A missing val or test split is carved out of train with the ratios below.")
    split_controls(settings)
    few_shot(settings)
    splits = splitting.split_items(result, settings["split"], settings["split_seed"], settings["max_per_class"])
    table = pd.DataFrame({s: pd.Series([result.classes[it.label] for it in items]).value_counts()
                          for s, items in splits.items()}).reindex(result.classes).fillna(0).astype(int)
    st.dataframe(table, width="stretch")
    leakage(splits, root)


def split_controls(settings: dict) -> None:
    """Train and validation percent (test takes the rest) and the split's seed."""
    cols = st.columns(4)
    train, val = config.split_percents(settings["split"])
    train_pct = cols[0].number_input("Train %", *config.SPLIT_PERCENT["train"], train, key="train_pct")
    val_pct = cols[1].number_input("Validation %", *config.SPLIT_PERCENT["val"], val, key="val_pct")
    cols[2].metric("Test %", 100 - train_pct - val_pct)
    settings["split_seed"] = cols[3].number_input("Split seed", value=settings["split_seed"], key="split_seed",
                                                  **common.limits("split_seed"))
    split = config.split_from_percents(train_pct, val_pct)
    if split is None:
        st.error("Train and validation add up to more than 100%.")
        common.stop()
    settings["split"] = split


def few_shot(settings: dict) -> None:
    few = st.checkbox("Few-shot: cap training images per class", value=settings["max_per_class"] is not None,
                      key="few_shot")
    settings["max_per_class"] = int(st.number_input("Images per class (train)", value=settings["max_per_class"] or 10,
                                                    key="cap", **common.limits("max_per_class"))) if few else None


def leakage(splits: dict, root: Path) -> None:
    """Identical files in train and another split make that split's accuracy optimistic."""
    groups = splitting.across_splits(identical(str(root), folders.tree_stamp(root)), splits)
    for split, n in splitting.leaked_counts(groups).items():
        if n:
            st.warning(f"{n} images appear in both train and {split} (identical files): {split} accuracy "
                       "will be optimistic (leakage). Remove the copies, or keep them in one split.")


main()
