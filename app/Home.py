"""The Gemma Scope Workbench explorer: ``scope app --store runs/NAME`` (or
``streamlit run app/Home.py -- --store runs/NAME [--model M]``)."""

from __future__ import annotations

from pathlib import Path

import steerlist
import streamlit as st
from explorer import store

HERE = Path(__file__).parent  # pages live in views/: a folder named pages/ makes Streamlit
# show its legacy page list instead of the navigation below

st.set_page_config(
    page_title="Gemma Scope Workbench", page_icon=":material/biotech:", layout="wide"
)

pages = {
    "overview": st.Page(HERE / "views/overview.py", title="Overview", icon=":material/dashboard:", url_path="overview", default=True),
    "feature": st.Page(HERE / "views/feature.py", title="Feature", icon=":material/bubble_chart:", url_path="feature"),
    "search": st.Page(HERE / "views/search.py", title="Search", icon=":material/search:", url_path="search"),
    "inspector": st.Page(HERE / "views/inspector.py", title="Prompt inspector", icon=":material/text_fields:", url_path="inspector"),
    "lab": st.Page(HERE / "views/lab.py", title="Steering lab", icon=":material/tune:", url_path="lab"),
    "why": st.Page(HERE / "views/why.py", title="Why", icon=":material/account_tree:", url_path="why"),
}  # fmt: skip
st.session_state["pages"] = pages
page = st.navigation(list(pages.values()))
params = st.query_params
if page is pages["overview"] and "sae" in params and "feature" in params:
    whole = {k: params.get_all(k) for k in params}  # a repeated steer= kept whole
    st.switch_page(pages["feature"], query_params=whole)  # ?sae=...&feature=... at the root
steerlist.sync(store().saes)  # the steer list from the URL, and back into it
page.run()
