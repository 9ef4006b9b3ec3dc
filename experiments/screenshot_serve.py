"""Screenshot of the review page after one feedback round (for README/docs).

    python experiments/screenshot_serve.py --workdir RUN --index IDX [--manifest M] [--case ID]
        [--out docs/serve.png]

Serves the run on a free loopback port, opens the page in headless Chromium (Debian
``chromium`` + ``chromium-driver``), queries with ``--case`` (default: the first indexed case
with every modality), marks the 2nd result relevant and the 1st not relevant, searches again
and saves a PNG of the page.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time


def wait_for(driver, script, timeout=120):
    t0 = time.time()
    while not driver.execute_script(script):
        if time.time() - t0 > timeout:
            raise TimeoutError(script)
        time.sleep(0.1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--index", required=True)
    ap.add_argument("--manifest")
    ap.add_argument("--case")
    ap.add_argument("--out", default="docs/serve.png")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=1500)
    a = ap.parse_args(argv)
    from selenium import webdriver
    from selenium.webdriver.common.by import By

    from mmvae.serve import BackgroundServer
    from mmvae.serve.app import create_app
    from mmvae.serve.service import ReviewService

    service = ReviewService.load(a.workdir, a.index, a.manifest)
    live = BackgroundServer(create_app(service))
    case = a.case or next(c for c in service.retriever.index.case_ids
                          if set(service.retriever.index.metadata(c)["modalities"]) == set(service.modalities))
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for x in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={a.width},{a.height}"):
        opts.add_argument(x)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    try:
        driver.get(live.url + "/")
        wait_for(driver, "return document.body.dataset.ready")
        driver.find_element(By.ID, "case-search").send_keys(case)
        driver.find_element(By.ID, "query-case").click()
        wait_for(driver, "return document.body.dataset.round === '0' && !document.body.dataset.busy")
        ids = driver.execute_script("return [...document.querySelectorAll('#results .result')].map(x => x.dataset.caseId)")
        driver.find_element(By.CSS_SELECTOR, f".result[data-case-id='{ids[1]}'] .mark-relevant").click()
        driver.find_element(By.CSS_SELECTOR, f".result[data-case-id='{ids[0]}'] .mark-nonrelevant").click()
        driver.find_element(By.ID, "search-again").click()
        wait_for(driver, "return document.body.dataset.round === '1' && !document.body.dataset.busy")
        wait_for(driver, "const r = [...document.querySelectorAll('#results .result')]; "
                         "return r.length && r.every(x => x.dataset.loaded) && "
                         "[...document.querySelectorAll('img.thumb')].every(i => i.complete && i.naturalWidth > 0)")
        time.sleep(0.5)
        driver.save_screenshot(a.out)
        print(f"query {case}: round 0 {ids[:5]}; screenshot -> {a.out}")
    finally:
        driver.quit()
        live.stop()
        service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
