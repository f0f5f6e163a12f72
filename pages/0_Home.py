"""Home: what the app does, where this user is in the flow, the Quick demo, presets, runs."""
import streamlit as st

from pages import show_loading

LOADING = show_loading()      # the imports below take seconds on a server's first visit; main() clears it

from core import paths
from core.serve import access
from core.serve.status import RunStatus, State
from pages import common


def main() -> None:
    LOADING.empty()
    settings = common.setup("Home")
    st.title("Finetune Lab")
    st.markdown(
        "Finetune Lab teaches a network that already knows ImageNet's 1000 classes to recognise "
        "**your** classes, from a folder or zip of labelled images, without writing code. "
        "You choose the backbone, how much of it to freeze and how to train, and watch it learn "
        "on the CPU or a GPU. Then you study what it learned: accuracy, confusion matrix, its best "
        "and worst images, feature maps and attributions, and a one-click report to hand in.")
    if common.lab().take("quick_demo_done"):
        st.switch_page(common.PAGES["evaluate"])
    quick_demo(settings)
    checklist(settings)
    common.presets_panel(settings)
    runs = common.my_runs()
    if runs:
        st.subheader("Runs" if common.user().admin else "My runs")
        st.dataframe(common.runs_frame(), hide_index=True, width="stretch", column_config={
            "best_val_acc": st.column_config.NumberColumn("best val acc", format="percent"),
            "test_acc": st.column_config.NumberColumn("test acc", format="percent")})
    if common.user().admin:          # students needn't learn the server's paths
        st.caption(f"Runs and uploads are stored in `{common.data_dir_hint()}`.")
    common.queue_panel()
    admin_panel()
    common.finish()


def checklist(settings: dict) -> None:
    """Where the session is in the flow, with a link to each step."""
    mine = [r for r in common.my_runs() if common.mine(r)]
    finished = [r for r in mine if r.status().state == State.FINISHED]
    demo = settings["data_root"] == common.default_settings()["data_root"]
    steps = [
        ("data", "1. Data", settings.get("data_label", settings["data_root"])
         + (" (the built-in default; drop your own images on the Data page)" if demo else ""), True),
        ("model", "2. Model", f"`{settings['arch']}`, {settings['freeze'].replace('_', '-')}", True),
        ("train", "3. Train", f"{len(mine)} run(s) started in this session", bool(mine)),
        ("evaluate", "4. Evaluate", f"{len(finished)} finished", bool(finished)),
        ("inspect", "5. Inspect", "feature maps, filters, sparsity, attributions", bool(finished)),
    ]
    st.subheader("Your progress")
    for page, label, detail, done in steps:
        left, right = st.columns([1, 4])
        common.link(page, label, ":material/check_box:" if done else ":material/check_box_outline_blank:", where=left)
        right.markdown(detail)


def start_quick_demo():
    """The embedded default, end to end: demo data, bundled MobileNetV2, head-only training on
    cached features. The session's settings go back to those defaults."""
    settings = common.default_settings()
    common.state.reset(settings)
    cfg = common.run_config(dict(settings, name="Quick demo"))
    try:
        run = common.submit(cfg)
    except ValueError as err:          # this student's queue is full
        common.lab().note("quick_demo_error", str(err))
        return
    common.lab().current_run = common.lab().quick_demo = run.id


def quick_demo(settings: dict) -> None:
    box = st.container(border=True)
    box.markdown("**New here?** One click trains the built-in example: 1,000 Fashion-MNIST images, the "
                 "MobileNetV2 that ships with the app, only its last layer trained. It takes about a "
                 "minute on a laptop CPU and opens the results when done.")
    box.button("▶️ Quick demo", type="primary", on_click=start_quick_demo, key="quick_demo_button")
    if error := common.lab().take("quick_demo_error"):
        box.error(error)
    run_id = common.lab().quick_demo
    if run_id:
        with box:
            quick_demo_progress(run_id)


@st.fragment(run_every=1)
def quick_demo_progress(run_id: str):
    try:
        run = common.open_run(run_id)
    except FileNotFoundError:
        common.lab().quick_demo = None
        return
    status = run.status()
    if status.active:
        demo_progress(run_id, status)
        return
    common.lab().quick_demo = None
    if status.state == State.FINISHED:
        accuracy = status.test_acc if status.test_acc is not None else float("nan")
        st.success(f"Done: test accuracy {accuracy:.1%}. Opening the results…")
        common.lab().note("quick_demo_done", "yes")
    else:
        common.lab().note("quick_demo_error", f"The demo run {status.state}: {status.message}")
    st.rerun(scope="app")


def demo_progress(run_id: str, status: RunStatus) -> None:
    steps = status.steps or 0
    st.progress(min(1.0, (status.step or 0) / steps) if steps else 0.0, text=status.message or "Starting…")
    if status.state == State.QUEUED and (place := common.queue_place(run_id)):
        st.caption(place)


def executor_note() -> str:
    from core.serve import slots
    fixed = " (fixed by FINETUNE_LAB_SLOTS / FINETUNE_LAB_RUNS_PER_GPU on the server)" if slots.fixed_by_env() else ""
    view = common.MANAGER.overview()
    return (f"**Where runs train**: each in its own process, {len(view['slots'])} at once{fixed}: "
            + ", ".join(slot.label() for slot in view["slots"]) + ".")


@st.cache_data(ttl=60, show_spinner="Measuring the data directory…")
def disk_usage() -> dict:
    return access.disk_usage()      # walks every file: at most once a minute


def admin_panel() -> None:
    """The teacher's controls: who is admin, what students may do, disk use and clean-up."""
    who = common.user()
    if not who.admin:
        st.caption("You are a student on this server: you see your own runs, uploads and presets.")
        return
    with st.expander(":material/key: Teacher (admin) settings"):
        st.caption(access.role_note(common.admin_token()))
        rules = common.policy()
        policy_form(rules)
        disk_panel(rules)
        class_accounts()


def policy_form(rules: access.Policy) -> None:
    with st.form("policy_form"):
        folders = st.checkbox("Students may open server folders (below the roots)", rules.server_folders)
        roots = st.text_area("Extra roots students may read (one folder per line)", "\n".join(rules.roots),
                             help=f"Always allowed: {paths.shared_dir()} and the shipped demo.")
        values = student_caps(rules)
        st.caption(executor_note())
        slots, ray = slot_inputs(rules)
        values.update(slots, **task_inputs(rules))
        if st.form_submit_button("Save settings"):
            save_policy(folders, roots, ray, values)


def student_caps(rules: access.Policy) -> dict:
    """What one student may queue, train and upload, and when uploads are cleaned up."""
    c = st.columns(3)
    limits = access.LIMITS
    return dict(
        max_queued=c[0].number_input("Runs a student may queue", *limits["max_queued"], rules.max_queued),
        max_epochs=c[1].number_input("Epoch cap per student run (0 = none)", *limits["max_epochs"], rules.max_epochs),
        max_minutes=c[2].number_input("Minutes cap per student run (0 = none)", *limits["max_minutes"],
                                      rules.max_minutes),
        upload_mb=c[0].number_input("MB per upload (unpacked)", *limits["upload_mb"], rules.upload_mb),
        user_mb=c[1].number_input("MB per student (all uploads)", *limits["user_mb"], rules.user_mb),
        total_mb=c[2].number_input("MB for the whole data directory (0 = none)", *limits["total_mb"],
                                   rules.total_mb),
        keep_days=c[0].number_input("Clean-up: uploads older than (days)", *limits["keep_days"], rules.keep_days))


def slot_inputs(rules: access.Policy) -> tuple[dict, str]:
    """(how many runs train at once, the Ray cluster's address as typed)."""
    c = st.columns(3)
    values = dict(
        slots=c[0].number_input("Runs training at once on the CPU (0 = automatic)", *access.LIMITS["slots"],
                                rules.slots, help="Each run trains in its own process; the cores are shared between them."),
        runs_per_gpu=c[1].number_input("Runs per GPU", *access.LIMITS["runs_per_gpu"], rules.runs_per_gpu,
                                       help="Small runs leave a GPU half idle: 2-4 per GPU keeps it busy."))
    ray = c[2].text_input("Ray cluster (dashboard address, empty = this machine)", rules.ray_address,
                          placeholder="http://head-machine:8265")
    return values, ray


def task_inputs(rules: access.Policy) -> dict:
    """Page tasks (audits, LR tests) beside the runs, and the cache of shared folders."""
    c = st.columns(3)
    return dict(
        max_tasks=c[0].number_input("Page tasks at once (audits, LR tests)", *access.LIMITS["max_tasks"],
                                    rules.max_tasks, help="Each runs in its own process beside the training runs."),
        task_minutes=c[1].number_input("Minutes cap per student page task", *access.LIMITS["task_minutes"],
                                       rules.task_minutes),
        cache_mb=c[2].number_input("MB for the cache of shared folders", *access.LIMITS["cache_mb"], rules.cache_mb,
                                   help="Embeddings and audits of shared folders; the oldest go first. "
                                        "A student's own uploads keep theirs inside the upload (in their quota)."))


def save_policy(folders: bool, roots: str, ray: str, values: dict) -> None:
    try:
        access.save_policy(access.Policy(server_folders=folders, roots=roots.splitlines(),
                                         ray_address=access.ray_address(ray), **values))
        common.MANAGER.reconfigure()
        st.success("Saved: they apply to the next action of every student.")
    except ValueError as err:
        st.error(str(err))


def disk_panel(rules: access.Policy) -> None:
    """Disk use of the data directory, and the clean-up of old uploads."""
    usage = disk_usage()
    cap = f" of {rules.total_mb:,} MB" if rules.total_mb else ""
    st.caption(f"Data directory: {usage['total'] / 2**20:,.0f} MB{cap} used ("
               + ", ".join(f"{k} {v / 2**20:,.0f} MB" for k, v in sorted(usage["parts"].items()))
               + f"); {usage['free'] / 2**30:,.1f} GB free on the disk.")
    if st.button(f"Delete uploads older than {rules.keep_days} days", key="clean_up"):
        st.success(f"Deleted {access.clean_up(rules.keep_days)} upload(s).")


def class_accounts() -> None:
    """The teacher makes a class's accounts and prints their one-time join codes."""
    from core.serve import accounts
    st.markdown("**Class accounts** — students sign in at `/lab/sign-in` with their account name and the "
                "join code, then choose a password. Codes are shown once: print or download them now.")
    new_accounts_form()
    if codes := common.lab().page.get("join_codes"):
        sheet = common.join_sheet(codes)
        st.dataframe(sheet, hide_index=True)
        st.download_button("Join codes (CSV)", common.csv_text(sheet), "join-codes.csv", "text/csv", key="codes_csv")
    existing = accounts.list_accounts()
    if existing:
        manage_accounts(existing)


def new_accounts_form() -> None:
    from core.serve import accounts
    with st.form("class_form"):
        c = st.columns([2, 3, 1])
        klass = c[0].text_input("Class", placeholder="Lab 3")
        names = c[1].text_area("Student names, one per line (or leave empty and give a count)", height=68)
        count = c[2].number_input("Count", 0, 500, 0)
        if st.form_submit_button("Create accounts"):
            try:
                made = accounts.create_class(klass or "class", names.splitlines() if names.strip() else int(count))
                common.lab().page["join_codes"] = [(a.id, a.name, code) for a, code in made]
            except accounts.AccountError as err:
                st.error(str(err))


def manage_accounts(existing: list) -> None:
    """A new join code for one account, or its deletion."""
    from core.serve import accounts
    with st.popover(f"{len(existing)} account(s): new join code or delete"):
        who = st.selectbox("Account", [a.id for a in existing], key="account_pick")
        left, right = st.columns(2)
        if left.button("New join code", key="account_reset"):
            common.lab().page["join_codes"] = [(who, accounts.get(who).name, accounts.reset_code(who))]
            st.rerun()
        if right.button("Delete account", key="account_delete"):
            accounts.delete_account(who)
            st.rerun()


main()
